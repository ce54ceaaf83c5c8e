"""Edge circuits over attention heads and MLPs: graph, patching, EAP / EAP-IG, ACDC, Edge
Pruning, HAP, and their shared evaluation (DESIGN 8.1-8.2)."""
