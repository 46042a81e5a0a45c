"""melecole.losses"""
