"""The runtime the steps share: params, files, tracking, shards, launch, faults, plots."""
