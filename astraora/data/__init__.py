"""LightningDataModules: real datasets, local-folder sources and generated offline sources."""
