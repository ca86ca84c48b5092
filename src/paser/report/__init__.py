"""Reports: plots, and the HTML/Markdown experiment report."""
