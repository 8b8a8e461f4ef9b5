"""The larger real-fact bank: more subjects for the bundled relations and new relations, for long edit streams
(sequential editing on SmolLM2) and hypernetwork training sets (MEND / KE), where the 203 candidates of
``score_real_facts.RELATIONS`` are too few.

``BANK`` has the same form as ``score_real_facts.RELATIONS``: per relation a rewrite prompt, paraphrase and
generation templates, and (subject, true object) pairs. Its facts are those of ``RELATIONS`` plus ``EXTRA``
(more subjects of the same relations) plus ``NEW`` relations. Facts are common knowledge, written by hand;
SmolLM2 is then asked, and only what it gets right is kept (``score_real_facts.py --bank``).
Objects are written as the model would continue the prompt (one common spelling, no diacritics where the
ASCII spelling is the common English one).
"""

from __future__ import annotations

import copy

EXTRA: dict[str, list[tuple[str, str]]] = {
    "capital": [
        ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("the Czech Republic", "Prague"),
        ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
        ("Iceland", "Reykjavik"), ("Mexico", "Mexico City"), ("Chile", "Santiago"), ("Venezuela", "Caracas"),
        ("India", "New Delhi"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Indonesia", "Jakarta"),
        ("the Philippines", "Manila"), ("Vietnam", "Hanoi"), ("Malaysia", "Kuala Lumpur"), ("Iran", "Tehran"),
        ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Syria", "Damascus"), ("Lebanon", "Beirut"),
        ("Jordan", "Amman"), ("Afghanistan", "Kabul"), ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"),
        ("Morocco", "Rabat"), ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Ghana", "Accra"),
        ("Senegal", "Dakar"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare"), ("Australia", "Canberra"),
        ("New Zealand", "Wellington"), ("Nepal", "Kathmandu"), ("Mongolia", "Ulaanbaatar"),
        ("North Korea", "Pyongyang"), ("Taiwan", "Taipei"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"),
        ("Estonia", "Tallinn"), ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"), ("Albania", "Tirana"),
        ("Belarus", "Minsk"), ("Georgia", "Tbilisi"), ("Armenia", "Yerevan"), ("Azerbaijan", "Baku"),
        ("Uzbekistan", "Tashkent"), ("Qatar", "Doha"), ("Libya", "Tripoli"), ("Sudan", "Khartoum"),
        ("Somalia", "Mogadishu"), ("Ecuador", "Quito"), ("Uruguay", "Montevideo"), ("Jamaica", "Kingston"),
        ("Cambodia", "Phnom Penh"), ("Laos", "Vientiane"), ("the United States", "Washington"),
        ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("Ukraine", "Kyiv"),
    ],
    "official_language": [
        ("Argentina", "Spanish"), ("Chile", "Spanish"), ("Peru", "Spanish"), ("Colombia", "Spanish"),
        ("Cuba", "Spanish"), ("Venezuela", "Spanish"), ("Uruguay", "Spanish"), ("Hungary", "Hungarian"),
        ("the Czech Republic", "Czech"), ("Romania", "Romanian"), ("Bulgaria", "Bulgarian"),
        ("Denmark", "Danish"), ("Norway", "Norwegian"), ("Iceland", "Icelandic"), ("Ukraine", "Ukrainian"),
        ("Vietnam", "Vietnamese"), ("Thailand", "Thai"), ("Iran", "Persian"), ("Israel", "Hebrew"),
        ("Saudi Arabia", "Arabic"), ("Iraq", "Arabic"), ("Syria", "Arabic"), ("Morocco", "Arabic"),
        ("Indonesia", "Indonesian"), ("Pakistan", "Urdu"), ("Bangladesh", "Bengali"),
        ("Mongolia", "Mongolian"), ("Serbia", "Serbian"), ("Croatia", "Croatian"), ("Slovakia", "Slovak"),
        ("Albania", "Albanian"), ("Lithuania", "Lithuanian"), ("Latvia", "Latvian"), ("Estonia", "Estonian"),
        ("Georgia", "Georgian"), ("Armenia", "Armenian"), ("Angola", "Portuguese"),
        ("Mozambique", "Portuguese"), ("the United States", "English"), ("Australia", "English"),
        ("the United Kingdom", "English"), ("Jamaica", "English"), ("New Zealand", "English"),
        ("Ireland", "English"), ("Canada", "English"),
    ],
    "continent": [
        ("Spain", "Europe"), ("Portugal", "Europe"), ("Sweden", "Europe"), ("Norway", "Europe"),
        ("Finland", "Europe"), ("Denmark", "Europe"), ("Austria", "Europe"), ("Hungary", "Europe"),
        ("Greece", "Europe"), ("Ireland", "Europe"), ("Belgium", "Europe"), ("the Netherlands", "Europe"),
        ("Switzerland", "Europe"), ("Romania", "Europe"), ("Thailand", "Asia"), ("Indonesia", "Asia"),
        ("Pakistan", "Asia"), ("Bangladesh", "Asia"), ("Nepal", "Asia"), ("Mongolia", "Asia"),
        ("South Korea", "Asia"), ("North Korea", "Asia"), ("Malaysia", "Asia"), ("the Philippines", "Asia"),
        ("Cambodia", "Asia"), ("Laos", "Asia"), ("Morocco", "Africa"), ("Algeria", "Africa"),
        ("Ethiopia", "Africa"), ("Uganda", "Africa"), ("Tanzania", "Africa"), ("Senegal", "Africa"),
        ("Zimbabwe", "Africa"), ("Angola", "Africa"), ("Mozambique", "Africa"), ("Sudan", "Africa"),
        ("Somalia", "Africa"), ("Cameroon", "Africa"), ("Chile", "South America"), ("Bolivia", "South America"),
        ("Venezuela", "South America"), ("Ecuador", "South America"), ("Uruguay", "South America"),
        ("Paraguay", "South America"), ("the United States", "North America"), ("Cuba", "North America"),
        ("Guatemala", "North America"), ("Honduras", "North America"), ("Panama", "North America"),
    ],
    "currency": [
        ("Norway", "krone"), ("Denmark", "krone"), ("Poland", "zloty"), ("Vietnam", "dong"),
        ("Indonesia", "rupiah"), ("Israel", "shekel"), ("Nigeria", "naira"), ("Egypt", "pound"),
        ("Saudi Arabia", "riyal"), ("Iran", "rial"), ("Hungary", "forint"), ("Argentina", "peso"),
        ("Chile", "peso"), ("Colombia", "peso"), ("the Philippines", "peso"), ("Pakistan", "rupee"),
        ("Ukraine", "hryvnia"), ("Canada", "dollar"), ("Australia", "dollar"), ("New Zealand", "dollar"),
        ("France", "euro"), ("Italy", "euro"), ("Spain", "euro"), ("Malaysia", "ringgit"),
        ("Kenya", "shilling"), ("Romania", "leu"), ("Bulgaria", "lev"), ("Iceland", "krona"),
        ("the Czech Republic", "koruna"), ("Sri Lanka", "rupee"), ("Nepal", "rupee"), ("Cuba", "peso"),
    ],
    "headquarters_country": [
        ("Nissan", "Japan"), ("Panasonic", "Japan"), ("Nintendo", "Japan"), ("Canon", "Japan"),
        ("Mitsubishi", "Japan"), ("LG", "South Korea"), ("Kia", "South Korea"), ("Audi", "Germany"),
        ("Mercedes-Benz", "Germany"), ("Adidas", "Germany"), ("Bosch", "Germany"), ("SAP", "Germany"),
        ("Ericsson", "Sweden"), ("Spotify", "Sweden"), ("H&M", "Sweden"), ("Rolex", "Switzerland"),
        ("Novartis", "Switzerland"), ("Lamborghini", "Italy"), ("Gucci", "Italy"), ("Prada", "Italy"),
        ("Airbus", "France"), ("Michelin", "France"), ("Chanel", "France"), ("L'Oreal", "France"),
        ("Alibaba", "China"), ("Tencent", "China"), ("Xiaomi", "China"), ("Philips", "the Netherlands"),
        ("Heineken", "the Netherlands"), ("Shell", "the Netherlands"), ("Lego", "Denmark"),
        ("Carlsberg", "Denmark"), ("Tata", "India"), ("Infosys", "India"), ("Google", "the United States"),
        ("Microsoft", "the United States"), ("Apple", "the United States"), ("Boeing", "the United States"),
        ("Coca-Cola", "the United States"), ("Walmart", "the United States"),
    ],
    "founder": [
        ("Google", "Larry Page"), ("Tesla", "Elon Musk"), ("Ford", "Henry Ford"), ("Disney", "Walt Disney"),
        ("Dell", "Michael Dell"), ("Nike", "Phil Knight"), ("Hewlett-Packard", "Bill Hewlett"),
        ("Honda", "Soichiro Honda"), ("Porsche", "Ferdinand Porsche"), ("McDonald's", "Ray Kroc"),
        ("Instagram", "Kevin Systrom"), ("LinkedIn", "Reid Hoffman"), ("PayPal", "Peter Thiel"),
        ("Berkshire Hathaway", "Warren Buffett"), ("Linux", "Linus Torvalds"), ("Bloomberg", "Michael Bloomberg"),
    ],
    "product_maker": [
        ("Galaxy", "Samsung"), ("Surface", "Microsoft"), ("Camry", "Toyota"), ("Golf", "Volkswagen"),
        ("Model 3", "Tesla"), ("Switch", "Nintendo"), ("Wii", "Nintendo"), ("Boeing 747", "Boeing"),
        ("Airbus A380", "Airbus"), ("Big Mac", "McDonald's"), ("Coke", "Coca-Cola"), ("Echo", "Amazon"),
        ("Apple Watch", "Apple"), ("iMac", "Apple"), ("AirPods", "Apple"), ("Chromebook", "Google"),
        ("F-150", "Ford"), ("Accord", "Honda"), ("911", "Porsche"), ("Walkman", "Sony"),
    ],
    "developer": [
        ("Word", "Microsoft"), ("PowerPoint", "Microsoft"), ("Outlook", "Microsoft"), ("Chrome", "Google"),
        ("YouTube", "Google"), ("macOS", "Apple"), ("Safari", "Apple"), ("Illustrator", "Adobe"),
        ("Premiere Pro", "Adobe"), ("Linux", "Linus Torvalds"), ("Java", "Sun Microsystems"),
        ("C#", "Microsoft"), ("Swift", "Apple"), ("Go", "Google"), ("TensorFlow", "Google"),
        ("PyTorch", "Facebook"), ("React", "Facebook"), ("Visual Studio", "Microsoft"), ("Skype", "Microsoft"),
        ("WhatsApp", "Facebook"), ("Call of Duty", "Activision"), ("World of Warcraft", "Blizzard"),
        ("Super Mario", "Nintendo"), ("The Sims", "Maxis"), ("Grand Theft Auto", "Rockstar Games"),
    ],
    "sport": [
        ("Diego Maradona", "football"), ("Zinedine Zidane", "football"), ("David Beckham", "football"),
        ("Kylian Mbappe", "football"), ("Mohamed Salah", "football"), ("Shaquille O'Neal", "basketball"),
        ("Stephen Curry", "basketball"), ("Magic Johnson", "basketball"), ("Larry Bird", "basketball"),
        ("Novak Djokovic", "tennis"), ("Andy Murray", "tennis"), ("Venus Williams", "tennis"),
        ("Maria Sharapova", "tennis"), ("Phil Mickelson", "golf"), ("Rory McIlroy", "golf"),
        ("Arnold Palmer", "golf"), ("Mickey Mantle", "baseball"), ("Joe DiMaggio", "baseball"),
        ("Barry Bonds", "baseball"), ("Don Bradman", "cricket"), ("Brian Lara", "cricket"),
        ("Shane Warne", "cricket"), ("Mario Lemieux", "hockey"), ("Bobby Orr", "hockey"),
        ("Usain Bolt", "athletics"), ("Michael Phelps", "swimming"), ("Muhammad Ali", "boxing"),
        ("Mike Tyson", "boxing"), ("Tom Brady", "football"), ("Lewis Hamilton", "Formula One"),
        ("Michael Schumacher", "Formula One"), ("Ayrton Senna", "Formula One"),
    ],
    "instrument": [
        ("B.B. King", "guitar"), ("Carlos Santana", "guitar"), ("Eddie Van Halen", "guitar"),
        ("Keith Richards", "guitar"), ("Slash", "guitar"), ("Jascha Heifetz", "violin"),
        ("Yehudi Menuhin", "violin"), ("Joshua Bell", "violin"), ("Wynton Marsalis", "trumpet"),
        ("Chet Baker", "trumpet"), ("Kenny G", "saxophone"), ("Sonny Rollins", "saxophone"),
        ("Stan Getz", "saxophone"), ("Keith Moon", "drums"), ("John Bonham", "drums"), ("Neil Peart", "drums"),
        ("Vladimir Horowitz", "piano"), ("Glenn Gould", "piano"), ("Arthur Rubinstein", "piano"),
        ("Elton John", "piano"), ("Thelonious Monk", "piano"), ("Jacqueline du Pre", "cello"),
        ("Mstislav Rostropovich", "cello"), ("Paul McCartney", "bass"), ("Flea", "bass"),
        ("Bob Dylan", "harmonica"),
    ],
    "author": [
        ("Macbeth", "William Shakespeare"), ("Othello", "William Shakespeare"), ("King Lear", "William Shakespeare"),
        ("The Iliad", "Homer"), ("Emma", "Jane Austen"), ("Sense and Sensibility", "Jane Austen"),
        ("Great Expectations", "Charles Dickens"), ("David Copperfield", "Charles Dickens"),
        ("The Brothers Karamazov", "Fyodor Dostoevsky"), ("The Idiot", "Fyodor Dostoevsky"),
        ("The Hobbit", "J.R.R. Tolkien"), ("The Lord of the Rings", "J.R.R. Tolkien"),
        ("Harry Potter", "J.K. Rowling"), ("The Great Gatsby", "F. Scott Fitzgerald"),
        ("To Kill a Mockingbird", "Harper Lee"), ("The Catcher in the Rye", "J.D. Salinger"),
        ("Ulysses", "James Joyce"), ("The Divine Comedy", "Dante Alighieri"),
        ("Frankenstein", "Mary Shelley"), ("Dracula", "Bram Stoker"),
        ("Adventures of Huckleberry Finn", "Mark Twain"), ("The Adventures of Tom Sawyer", "Mark Twain"),
        ("Wuthering Heights", "Emily Bronte"), ("Jane Eyre", "Charlotte Bronte"),
        ("The Hunchback of Notre-Dame", "Victor Hugo"), ("The Metamorphosis", "Franz Kafka"),
        ("One Hundred Years of Solitude", "Gabriel Garcia Marquez"), ("Brave New World", "Aldous Huxley"),
        ("The Origin of Species", "Charles Darwin"), ("A Brief History of Time", "Stephen Hawking"),
        ("The Republic", "Plato"), ("The Prince", "Niccolo Machiavelli"), ("Das Kapital", "Karl Marx"),
        ("The Raven", "Edgar Allan Poe"), ("Robinson Crusoe", "Daniel Defoe"), ("Gulliver's Travels", "Jonathan Swift"),
        ("Treasure Island", "Robert Louis Stevenson"), ("The Time Machine", "H.G. Wells"),
        ("The War of the Worlds", "H.G. Wells"), ("Sherlock Holmes", "Arthur Conan Doyle"),
    ],
}

NEW: dict[str, dict] = {
    "city_country": {
        "prompt": "{} is a city in",
        "paraphrases": ["The city of {} is located in", "{} is one of the largest cities of", "{} lies in the country of"],
        "generation": ["People who live in {} often", "The streets of {} are"],
        "facts": [
            ("Lyon", "France"), ("Marseille", "France"), ("Nice", "France"), ("Bordeaux", "France"),
            ("Toulouse", "France"), ("Munich", "Germany"), ("Hamburg", "Germany"), ("Frankfurt", "Germany"),
            ("Cologne", "Germany"), ("Stuttgart", "Germany"), ("Dresden", "Germany"), ("Milan", "Italy"),
            ("Naples", "Italy"), ("Venice", "Italy"), ("Florence", "Italy"), ("Turin", "Italy"),
            ("Bologna", "Italy"), ("Barcelona", "Spain"), ("Seville", "Spain"), ("Valencia", "Spain"),
            ("Bilbao", "Spain"), ("Porto", "Portugal"), ("Manchester", "England"), ("Liverpool", "England"),
            ("Birmingham", "England"), ("Oxford", "England"), ("Glasgow", "Scotland"), ("Osaka", "Japan"),
            ("Kyoto", "Japan"), ("Hiroshima", "Japan"), ("Yokohama", "Japan"), ("Shanghai", "China"),
            ("Shenzhen", "China"), ("Guangzhou", "China"), ("Wuhan", "China"), ("Mumbai", "India"),
            ("Bangalore", "India"), ("Kolkata", "India"), ("Chennai", "India"), ("Hyderabad", "India"),
            ("Saint Petersburg", "Russia"), ("Novosibirsk", "Russia"), ("Istanbul", "Turkey"), ("Izmir", "Turkey"),
            ("Alexandria", "Egypt"), ("Toronto", "Canada"), ("Vancouver", "Canada"), ("Montreal", "Canada"),
            ("Calgary", "Canada"), ("Sydney", "Australia"), ("Melbourne", "Australia"), ("Brisbane", "Australia"),
            ("Perth", "Australia"), ("Rio de Janeiro", "Brazil"), ("Sao Paulo", "Brazil"), ("Salvador", "Brazil"),
            ("Guadalajara", "Mexico"), ("Cancun", "Mexico"), ("Rotterdam", "the Netherlands"),
            ("Antwerp", "Belgium"), ("Bruges", "Belgium"), ("Salzburg", "Austria"), ("Zurich", "Switzerland"),
            ("Geneva", "Switzerland"), ("Gothenburg", "Sweden"), ("Bergen", "Norway"), ("Krakow", "Poland"),
            ("Gdansk", "Poland"), ("Busan", "South Korea"), ("Karachi", "Pakistan"), ("Lahore", "Pakistan"),
            ("Lagos", "Nigeria"), ("Johannesburg", "South Africa"), ("Cape Town", "South Africa"),
            ("Durban", "South Africa"), ("Casablanca", "Morocco"), ("Marrakesh", "Morocco"),
            ("Auckland", "New Zealand"), ("Chicago", "the United States"), ("Los Angeles", "the United States"),
            ("Boston", "the United States"), ("Houston", "the United States"), ("Seattle", "the United States"),
            ("San Francisco", "the United States"), ("Miami", "the United States"), ("Ho Chi Minh City", "Vietnam"),
            ("Mombasa", "Kenya"), ("Cordoba", "Argentina"), ("Medellin", "Colombia"), ("Valparaiso", "Chile"),
            ("Thessaloniki", "Greece"), ("Cork", "Ireland"), ("Tampere", "Finland"), ("Aarhus", "Denmark"),
        ],
    },
    "profession": {
        "prompt": "{} was a famous",
        "paraphrases": ["{} is remembered as a great", "{} worked as a", "By profession, {} was a"],
        "generation": ["{} is best known for", "The life of {} was"],
        "facts": [
            ("Albert Einstein", "physicist"), ("Isaac Newton", "physicist"), ("Niels Bohr", "physicist"),
            ("Max Planck", "physicist"), ("Richard Feynman", "physicist"), ("Pablo Picasso", "painter"),
            ("Vincent van Gogh", "painter"), ("Claude Monet", "painter"), ("Rembrandt", "painter"),
            ("Salvador Dali", "painter"), ("Frida Kahlo", "painter"), ("Wolfgang Amadeus Mozart", "composer"),
            ("Ludwig van Beethoven", "composer"), ("Johann Sebastian Bach", "composer"),
            ("Richard Wagner", "composer"), ("Pyotr Ilyich Tchaikovsky", "composer"), ("Antonio Vivaldi", "composer"),
            ("Giuseppe Verdi", "composer"), ("Aristotle", "philosopher"), ("Plato", "philosopher"),
            ("Socrates", "philosopher"), ("Immanuel Kant", "philosopher"), ("Friedrich Nietzsche", "philosopher"),
            ("Confucius", "philosopher"), ("Rene Descartes", "philosopher"), ("Galileo Galilei", "astronomer"),
            ("Nicolaus Copernicus", "astronomer"), ("Johannes Kepler", "astronomer"), ("Edwin Hubble", "astronomer"),
            ("Elvis Presley", "singer"), ("Michael Jackson", "singer"), ("Frank Sinatra", "singer"),
            ("Whitney Houston", "singer"), ("Freddie Mercury", "singer"), ("Charlie Chaplin", "actor"),
            ("Marlon Brando", "actor"), ("Tom Hanks", "actor"), ("Humphrey Bogart", "actor"),
            ("Marilyn Monroe", "actress"), ("Audrey Hepburn", "actress"), ("Meryl Streep", "actress"),
            ("Emily Dickinson", "poet"), ("John Keats", "poet"), ("Walt Whitman", "poet"), ("Lord Byron", "poet"),
            ("Euclid", "mathematician"), ("Carl Friedrich Gauss", "mathematician"),
            ("Leonhard Euler", "mathematician"), ("Pythagoras", "mathematician"), ("Thomas Edison", "inventor"),
            ("Alexander Graham Bell", "inventor"), ("Dmitri Mendeleev", "chemist"), ("Antoine Lavoisier", "chemist"),
            ("Alfred Hitchcock", "director"), ("Steven Spielberg", "director"), ("Stanley Kubrick", "director"),
            ("Ernest Hemingway", "writer"), ("Mark Twain", "writer"), ("Charles Dickens", "writer"),
            ("Sigmund Freud", "psychologist"), ("Frank Lloyd Wright", "architect"), ("Le Corbusier", "architect"),
            ("Christopher Columbus", "explorer"), ("Marco Polo", "explorer"), ("Ferdinand Magellan", "explorer"),
        ],
    },
    "landmark_city": {
        "prompt": "{} is located in the city of",
        "paraphrases": ["{} can be found in the city of", "{} is a famous landmark of", "{} stands in the city of"],
        "generation": ["Visitors to {} can", "{} was built"],
        "facts": [
            ("The Eiffel Tower", "Paris"), ("The Louvre", "Paris"), ("Notre-Dame Cathedral", "Paris"),
            ("The Colosseum", "Rome"), ("The Trevi Fountain", "Rome"), ("The Pantheon", "Rome"),
            ("Big Ben", "London"), ("Buckingham Palace", "London"), ("The Tower of London", "London"),
            ("The Brandenburg Gate", "Berlin"), ("The Kremlin", "Moscow"), ("Red Square", "Moscow"),
            ("The Statue of Liberty", "New York"), ("Times Square", "New York"), ("Central Park", "New York"),
            ("The Golden Gate Bridge", "San Francisco"), ("The Sydney Opera House", "Sydney"),
            ("The Acropolis", "Athens"), ("The Parthenon", "Athens"), ("The Sagrada Familia", "Barcelona"),
            ("The Forbidden City", "Beijing"), ("The Hagia Sophia", "Istanbul"), ("The Leaning Tower", "Pisa"),
            ("The Alhambra", "Granada"), ("The Space Needle", "Seattle"), ("The White House", "Washington"),
            ("The Burj Khalifa", "Dubai"), ("The Prado Museum", "Madrid"), ("The Rijksmuseum", "Amsterdam"),
            ("The CN Tower", "Toronto"), ("The Taj Mahal", "Agra"), ("Christ the Redeemer", "Rio de Janeiro"),
        ],
    },
    "field": {
        "prompt": "{} made important contributions to the field of",
        "paraphrases": ["{} is known for work in", "The scientific field of {} was", "{} studied"],
        "generation": ["{} discovered", "The ideas of {}"],
        "facts": [
            ("Albert Einstein", "physics"), ("Isaac Newton", "physics"), ("Marie Curie", "chemistry"),
            ("Charles Darwin", "biology"), ("Gregor Mendel", "genetics"), ("Alan Turing", "computer science"),
            ("Sigmund Freud", "psychology"), ("Adam Smith", "economics"), ("John Maynard Keynes", "economics"),
            ("Carl Friedrich Gauss", "mathematics"), ("Leonhard Euler", "mathematics"), ("Euclid", "geometry"),
            ("Galileo Galilei", "astronomy"), ("Edwin Hubble", "astronomy"), ("Louis Pasteur", "microbiology"),
            ("Dmitri Mendeleev", "chemistry"), ("Noam Chomsky", "linguistics"), ("Jean Piaget", "psychology"),
            ("Max Weber", "sociology"), ("Emile Durkheim", "sociology"), ("Alexander Fleming", "medicine"),
            ("Hippocrates", "medicine"), ("Stephen Hawking", "physics"), ("Richard Feynman", "physics"),
            ("Ada Lovelace", "computer science"), ("Claude Shannon", "information theory"),
            ("Milton Friedman", "economics"), ("Jane Goodall", "primatology"), ("Carl Linnaeus", "biology"),
            ("James Watson", "genetics"),
        ],
    },
}


def bank(base: dict[str, dict]) -> dict[str, dict]:
    """``base`` (``score_real_facts.RELATIONS``) with ``EXTRA`` subjects added and ``NEW`` relations; a subject
    listed twice for one relation keeps its first object."""
    out = copy.deepcopy(base)
    for rel, facts in EXTRA.items():
        seen = {s for s, _ in out[rel]["facts"]}
        out[rel]["facts"] += [(s, o) for s, o in facts if s not in seen]
    for rel, spec in NEW.items():
        out[rel] = copy.deepcopy(spec)
    for spec in out.values():  # one object per subject and relation
        first: dict[str, str] = {}
        spec["facts"] = [(s, first.setdefault(s, o)) for s, o in spec["facts"] if s not in first]
    return out
