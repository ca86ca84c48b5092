"""Selection: S2RIC clustering, CDAIS budget and efficiency order, NTM gate, baselines."""
