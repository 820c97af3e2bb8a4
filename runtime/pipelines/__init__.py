"""Pipeline bundles: prompt -> image (text encoders, scheduler sigmas, VAE) around a
transformer bundle (imports the base layer, solving, bundles, the plan and this room)."""
