"""Data: embedded demo world, LeRobot v3 dataset building, streaming, splits and statistics."""
