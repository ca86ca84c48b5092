"""Input/output: records, models, the shared prompt template, and on-disk caches."""
