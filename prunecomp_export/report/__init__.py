"""The sign-off report: typed results, thresholds, report.md/html and the console summary."""
