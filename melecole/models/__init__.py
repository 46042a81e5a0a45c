"""melecole.models"""
