"""Evaluation: tasks, graders, sampling n answers per task, unbiased pass@k, reports."""
