"""Everything that touches tensors or GPUs: the HPS model and score, training and
evaluation, the image generator, SD adaptation, the worker and its jobs."""
