"""Pure statistics for judging a canary against its stable version.

No I/O, no clock, no logging: every function takes counts and settings and returns
a decision with its reasons.  Nothing here imports ``canaryd`` or ``simulator``.
"""
