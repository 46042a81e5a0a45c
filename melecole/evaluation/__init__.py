"""melecole.evaluation"""
