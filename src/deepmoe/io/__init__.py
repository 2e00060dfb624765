"""Checkpoint I/O: safetensors files, HF / official tensor names, pretrained load and save."""
