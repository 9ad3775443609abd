"""Write side of gradstore: corpus -> per-example projected gradients -> datastore."""
