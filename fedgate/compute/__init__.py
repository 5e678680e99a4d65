"""fedgate.compute"""
