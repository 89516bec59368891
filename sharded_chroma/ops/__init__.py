"""Record operations: routing, the one seam for part requests, reads and the write path."""
