"""What a run reports: the startup summary table, the selection files and the heatmap logged to trackers."""
