"""Points in weight space: directions, the (α, β) grid and its refinement, plug-in geometries,
curves between two models, trajectories; and the contour levels drawn over them."""
