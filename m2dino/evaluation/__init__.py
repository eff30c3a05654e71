"""Evaluation: the challenge's metrics and submission format, ground truth and trivial
baselines, prediction and scoring of folders, and the transfer report."""
