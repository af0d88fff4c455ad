"""Spec -> loaded pipeline (cached across a sweep's jobs), its checked call arguments, its LoRAs."""
