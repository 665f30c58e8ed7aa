"""Files lsurf writes and reads back: the surface file, the curve file, a running job's progress."""
