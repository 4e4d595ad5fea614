"""Stage 1: the teacher runs once over a dataset (``build``) or over inputs it synthesizes
(``synthesize``) and its soft labels are written to a cache."""
