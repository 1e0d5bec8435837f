"""Adapters for training frameworks; each imports its framework only when used.

fused_ls.integrations.huggingface: Hugging Face transformers' Trainer (``pip install "fused_ls[hf]"``).
"""
