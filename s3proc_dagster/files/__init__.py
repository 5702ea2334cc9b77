"""Domain: what a file is and how to take it apart safely (snapshot, detection, archives).

Plain Python, no Dagster import: the ops call these and stay a few lines long.
"""
