"""Analysis of measured records: scaling fits, crossovers, comparisons (data, no rendering)."""
