"""The model: built-in and plug-in models, Hugging Face folders, checkpoints read by rows, θ* kept
and restored, and the model sharded over a rank group (FSDP2)."""
