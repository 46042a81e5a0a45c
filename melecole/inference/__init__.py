"""melecole.inference"""
