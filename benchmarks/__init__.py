"""Side-by-side benchmarks: goose beside the torch-native peer doing the same job, in the same run."""
