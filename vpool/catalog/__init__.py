"""The model catalog (`models.yaml`), the GPU table (`gpus.yaml`) and the memory planner.

catalog.py    load_catalog(): the built-in catalog with user catalogs merged over it
entry.py      CatalogEntry and its sections: what one model is
gpus.py       the GPU table and what `--dtype auto` runs on each GPU
hf_config.py  a local Hugging Face model directory read as an entry
planner.py    plan(): weights, KV cache and overhead per GPU, and the layout that fits
errors.py     CatalogError and its subclasses
"""
