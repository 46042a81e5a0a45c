"""melecole.engine"""
