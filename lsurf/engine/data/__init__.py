"""The data: splits in memory, on disk (stores, token files) or streamed, cut into batches per rank."""
