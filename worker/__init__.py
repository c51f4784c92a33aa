"""Celery glue around lqf_core plus the Redis job state and artifact store it shares with app."""
