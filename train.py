from astraora.train import main

main()
