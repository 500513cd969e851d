from flowlogs.main import main

main()
