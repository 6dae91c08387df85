"""seedboot's publisher tools: mirror publishing, verification and disk building."""
