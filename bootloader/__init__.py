"""bootloader package."""
