"""fedgate.audit"""
