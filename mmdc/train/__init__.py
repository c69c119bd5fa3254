"""The student: assembly (vision tower + projector + LM), conversation formatting and label masks, Ray Train loops."""
