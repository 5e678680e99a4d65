"""fedgate.congestion"""
