from conntrack.main import main

main()
