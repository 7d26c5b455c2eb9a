from astraora.cli import main

main()
