"""Tests of the trio QUIC driver (theta._quic) and the link conditioner."""
