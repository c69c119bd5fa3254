"""Everything that lives as a Ray actor or a Ray Serve deployment: the driver, the engines, the role clients."""
