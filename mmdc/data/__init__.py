"""Everything about rows: schemas, LLaVA loaders, the synthetic world, images, pools, filters, Ray Data pipelines."""
