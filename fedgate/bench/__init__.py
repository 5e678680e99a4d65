"""fedgate.bench"""
