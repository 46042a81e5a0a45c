"""melecole.data"""
