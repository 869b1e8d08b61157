"""Reading and writing checkpoint files: safe loading, key maps between layouts, family detection."""
