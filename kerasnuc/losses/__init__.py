"""Loss functions and the multi-task scheduler."""
