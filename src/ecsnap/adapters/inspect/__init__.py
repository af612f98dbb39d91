"""Looking inside disks without booting their guests (the file-system readers)."""
