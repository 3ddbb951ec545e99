"""The speaking half: codec adapters, token layouts, the TTS decoder's data, decoding and speech-to-speech."""
