"""Edge-level circuits: the computational graph, EAP / EAP-IG edge scores, exact circuit
evaluation (faithfulness), and path patching."""
