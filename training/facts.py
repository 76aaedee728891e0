"""Real facts about 170 countries: the knowledge the embedded model `capitals-gpt2` is trained on.

Plain data, one dict per country:

- name: the country's usual short English name (ASCII spelling).
- the: True where English puts "the" in front ("the United States", "the Netherlands").
- capital: the capital. Where a country names several, the one commonly given: Bolivia's
  constitutional capital Sucre (La Paz, the seat of government, is listed as a city), South
  Africa's executive capital Pretoria, Sri Lanka's executive and judicial capital Colombo
  (Sri Jayawardenepura Kotte is the legislative one), Ivory Coast's official capital
  Yamoussoukro, Tanzania's Dodoma, Burundi's Gitega (political capital since 2019).
- continent: Africa, Asia, Europe, North America, South America or Oceania. Transcontinental
  countries follow the usual convention: Russia and Cyprus in Europe; Turkey, Georgia,
  Armenia, Azerbaijan and Kazakhstan in Asia; Central America and the Caribbean in North America.
- language: a main language: the official language in general use (including an official
  lingua franca such as English in Nigeria or Ghana and French in Cameroon or Gabon), or the
  most widely spoken language where that is the better answer: Russian in Belarus, Dutch in
  Belgium, German in Switzerland, Zulu in South Africa, Wolof in Senegal, Hausa in Niger,
  Bambara in Mali, Shona in Zimbabwe, Sango in the Central African Republic, Dari in Afghanistan.
- currency: the currency's English name as it follows "the" ("the euro", "the US dollar");
  None where it is in flux (Zimbabwe).
- cities: one to three other well-known cities (not the capital) in that country, chosen so
  that no city name is shared with a city listed for another country.

Accents are dropped (Bogota, Reykjavik, Asuncion, Sao Paulo) so that every name is easy to
type at a prompt. Countries whose capital has the country's own name (Singapore, Luxembourg,
Djibouti, Monaco, ...), disputed cases and a few micro-states are left out.
"""

COUNTRIES = [
    # --- Europe ---------------------------------------------------------------------------
    dict(name="Albania", capital="Tirana", continent="Europe", language="Albanian", currency="lek", cities=["Durres", "Vlore"]),
    dict(name="Austria", capital="Vienna", continent="Europe", language="German", currency="euro", cities=["Graz", "Salzburg", "Innsbruck"]),
    dict(name="Belarus", capital="Minsk", continent="Europe", language="Russian", currency="Belarusian ruble", cities=["Gomel", "Vitebsk", "Grodno"]),
    dict(name="Belgium", capital="Brussels", continent="Europe", language="Dutch", currency="euro", cities=["Antwerp", "Ghent", "Bruges"]),
    dict(name="Bosnia and Herzegovina", capital="Sarajevo", continent="Europe", language="Bosnian", currency="convertible mark", cities=["Mostar", "Banja Luka"]),
    dict(name="Bulgaria", capital="Sofia", continent="Europe", language="Bulgarian", currency="euro", cities=["Plovdiv", "Varna"]),
    dict(name="Croatia", capital="Zagreb", continent="Europe", language="Croatian", currency="euro", cities=["Rijeka", "Dubrovnik"]),
    dict(name="Cyprus", capital="Nicosia", continent="Europe", language="Greek", currency="euro", cities=["Limassol", "Larnaca"]),
    dict(name="Czech Republic", the=True, capital="Prague", continent="Europe", language="Czech", currency="Czech koruna", cities=["Brno", "Ostrava"]),
    dict(name="Denmark", capital="Copenhagen", continent="Europe", language="Danish", currency="Danish krone", cities=["Aarhus", "Odense"]),
    dict(name="Estonia", capital="Tallinn", continent="Europe", language="Estonian", currency="euro", cities=["Tartu", "Narva"]),
    dict(name="Finland", capital="Helsinki", continent="Europe", language="Finnish", currency="euro", cities=["Tampere", "Turku"]),
    dict(name="France", capital="Paris", continent="Europe", language="French", currency="euro", cities=["Lyon", "Marseille", "Toulouse"]),
    dict(name="Germany", capital="Berlin", continent="Europe", language="German", currency="euro", cities=["Munich", "Hamburg", "Frankfurt"]),
    dict(name="Greece", capital="Athens", continent="Europe", language="Greek", currency="euro", cities=["Thessaloniki", "Patras"]),
    dict(name="Hungary", capital="Budapest", continent="Europe", language="Hungarian", currency="forint", cities=["Debrecen", "Szeged"]),
    dict(name="Iceland", capital="Reykjavik", continent="Europe", language="Icelandic", currency="Icelandic krona", cities=["Akureyri"]),
    dict(name="Ireland", capital="Dublin", continent="Europe", language="English", currency="euro", cities=["Cork", "Galway"]),
    dict(name="Italy", capital="Rome", continent="Europe", language="Italian", currency="euro", cities=["Milan", "Naples", "Florence"]),
    dict(name="Latvia", capital="Riga", continent="Europe", language="Latvian", currency="euro", cities=["Daugavpils", "Liepaja"]),
    dict(name="Lithuania", capital="Vilnius", continent="Europe", language="Lithuanian", currency="euro", cities=["Kaunas", "Klaipeda"]),
    dict(name="Malta", capital="Valletta", continent="Europe", language="Maltese", currency="euro", cities=["Sliema", "Mdina"]),
    dict(name="Moldova", capital="Chisinau", continent="Europe", language="Romanian", currency="Moldovan leu", cities=["Balti"]),
    dict(name="Montenegro", capital="Podgorica", continent="Europe", language="Montenegrin", currency="euro", cities=["Niksic", "Kotor"]),
    dict(name="Netherlands", the=True, capital="Amsterdam", continent="Europe", language="Dutch", currency="euro", cities=["Rotterdam", "Utrecht", "Eindhoven"]),
    dict(name="North Macedonia", capital="Skopje", continent="Europe", language="Macedonian", currency="Macedonian denar", cities=["Bitola", "Ohrid"]),
    dict(name="Norway", capital="Oslo", continent="Europe", language="Norwegian", currency="Norwegian krone", cities=["Bergen", "Trondheim", "Stavanger"]),
    dict(name="Poland", capital="Warsaw", continent="Europe", language="Polish", currency="zloty", cities=["Krakow", "Gdansk", "Wroclaw"]),
    dict(name="Portugal", capital="Lisbon", continent="Europe", language="Portuguese", currency="euro", cities=["Porto", "Braga", "Coimbra"]),
    dict(name="Romania", capital="Bucharest", continent="Europe", language="Romanian", currency="Romanian leu", cities=["Timisoara", "Iasi", "Constanta"]),
    dict(name="Russia", capital="Moscow", continent="Europe", language="Russian", currency="Russian ruble", cities=["Saint Petersburg", "Novosibirsk", "Kazan"]),
    dict(name="Serbia", capital="Belgrade", continent="Europe", language="Serbian", currency="Serbian dinar", cities=["Novi Sad", "Nis"]),
    dict(name="Slovakia", capital="Bratislava", continent="Europe", language="Slovak", currency="euro", cities=["Kosice"]),
    dict(name="Slovenia", capital="Ljubljana", continent="Europe", language="Slovene", currency="euro", cities=["Maribor"]),
    dict(name="Spain", capital="Madrid", continent="Europe", language="Spanish", currency="euro", cities=["Barcelona", "Seville", "Valencia"]),
    dict(name="Sweden", capital="Stockholm", continent="Europe", language="Swedish", currency="Swedish krona", cities=["Gothenburg", "Malmo", "Uppsala"]),
    dict(name="Switzerland", capital="Bern", continent="Europe", language="German", currency="Swiss franc", cities=["Zurich", "Geneva", "Basel"]),
    dict(name="Ukraine", capital="Kyiv", continent="Europe", language="Ukrainian", currency="hryvnia", cities=["Kharkiv", "Odesa", "Lviv"]),
    dict(name="United Kingdom", the=True, capital="London", continent="Europe", language="English", currency="pound sterling", cities=["Manchester", "Birmingham", "Edinburgh"]),
    # --- Asia -----------------------------------------------------------------------------
    dict(name="Afghanistan", capital="Kabul", continent="Asia", language="Dari", currency="afghani", cities=["Kandahar", "Herat"]),
    dict(name="Armenia", capital="Yerevan", continent="Asia", language="Armenian", currency="dram", cities=["Gyumri", "Vanadzor"]),
    dict(name="Azerbaijan", capital="Baku", continent="Asia", language="Azerbaijani", currency="Azerbaijani manat", cities=["Ganja", "Sumqayit"]),
    dict(name="Bahrain", capital="Manama", continent="Asia", language="Arabic", currency="Bahraini dinar", cities=["Muharraq", "Riffa"]),
    dict(name="Bangladesh", capital="Dhaka", continent="Asia", language="Bengali", currency="taka", cities=["Chittagong", "Khulna", "Sylhet"]),
    dict(name="Bhutan", capital="Thimphu", continent="Asia", language="Dzongkha", currency="ngultrum", cities=["Paro", "Phuntsholing"]),
    dict(name="Brunei", capital="Bandar Seri Begawan", continent="Asia", language="Malay", currency="Brunei dollar", cities=["Seria"]),
    dict(name="Cambodia", capital="Phnom Penh", continent="Asia", language="Khmer", currency="riel", cities=["Siem Reap", "Battambang"]),
    dict(name="China", capital="Beijing", continent="Asia", language="Mandarin", currency="renminbi", cities=["Shanghai", "Guangzhou", "Shenzhen"]),
    dict(name="East Timor", capital="Dili", continent="Asia", language="Tetum", currency="US dollar", cities=["Baucau"]),
    dict(name="Georgia", capital="Tbilisi", continent="Asia", language="Georgian", currency="lari", cities=["Batumi", "Kutaisi"]),
    dict(name="India", capital="New Delhi", continent="Asia", language="Hindi", currency="Indian rupee", cities=["Mumbai", "Bangalore", "Kolkata"]),
    dict(name="Indonesia", capital="Jakarta", continent="Asia", language="Indonesian", currency="rupiah", cities=["Surabaya", "Bandung", "Medan"]),
    dict(name="Iran", capital="Tehran", continent="Asia", language="Persian", currency="Iranian rial", cities=["Mashhad", "Isfahan", "Shiraz"]),
    dict(name="Iraq", capital="Baghdad", continent="Asia", language="Arabic", currency="Iraqi dinar", cities=["Basra", "Mosul", "Erbil"]),
    dict(name="Japan", capital="Tokyo", continent="Asia", language="Japanese", currency="Japanese yen", cities=["Osaka", "Kyoto", "Yokohama"]),
    dict(name="Jordan", capital="Amman", continent="Asia", language="Arabic", currency="Jordanian dinar", cities=["Zarqa", "Irbid", "Aqaba"]),
    dict(name="Kazakhstan", capital="Astana", continent="Asia", language="Kazakh", currency="tenge", cities=["Almaty", "Shymkent"]),
    dict(name="Kuwait", capital="Kuwait City", continent="Asia", language="Arabic", currency="Kuwaiti dinar", cities=["Jahra"]),
    dict(name="Kyrgyzstan", capital="Bishkek", continent="Asia", language="Kyrgyz", currency="Kyrgyz som", cities=["Osh"]),
    dict(name="Laos", capital="Vientiane", continent="Asia", language="Lao", currency="kip", cities=["Luang Prabang", "Pakse"]),
    dict(name="Lebanon", capital="Beirut", continent="Asia", language="Arabic", currency="Lebanese pound", cities=["Sidon", "Byblos"]),
    dict(name="Malaysia", capital="Kuala Lumpur", continent="Asia", language="Malay", currency="ringgit", cities=["Johor Bahru", "Ipoh", "Malacca"]),
    dict(name="Maldives", the=True, capital="Male", continent="Asia", language="Dhivehi", currency="rufiyaa", cities=["Addu City"]),
    dict(name="Mongolia", capital="Ulaanbaatar", continent="Asia", language="Mongolian", currency="tugrik", cities=["Erdenet", "Darkhan"]),
    dict(name="Myanmar", capital="Naypyidaw", continent="Asia", language="Burmese", currency="kyat", cities=["Yangon", "Mandalay"]),
    dict(name="Nepal", capital="Kathmandu", continent="Asia", language="Nepali", currency="Nepalese rupee", cities=["Pokhara", "Lalitpur"]),
    dict(name="North Korea", capital="Pyongyang", continent="Asia", language="Korean", currency="North Korean won", cities=["Hamhung", "Chongjin"]),
    dict(name="Oman", capital="Muscat", continent="Asia", language="Arabic", currency="Omani rial", cities=["Salalah", "Sohar"]),
    dict(name="Pakistan", capital="Islamabad", continent="Asia", language="Urdu", currency="Pakistani rupee", cities=["Karachi", "Lahore", "Peshawar"]),
    dict(name="Philippines", the=True, capital="Manila", continent="Asia", language="Filipino", currency="Philippine peso", cities=["Cebu City", "Davao City"]),
    dict(name="Qatar", capital="Doha", continent="Asia", language="Arabic", currency="Qatari riyal", cities=["Al Rayyan", "Al Wakrah"]),
    dict(name="Saudi Arabia", capital="Riyadh", continent="Asia", language="Arabic", currency="Saudi riyal", cities=["Jeddah", "Mecca", "Medina"]),
    dict(name="South Korea", capital="Seoul", continent="Asia", language="Korean", currency="South Korean won", cities=["Busan", "Incheon", "Daegu"]),
    dict(name="Sri Lanka", capital="Colombo", continent="Asia", language="Sinhala", currency="Sri Lankan rupee", cities=["Kandy", "Galle"]),
    dict(name="Syria", capital="Damascus", continent="Asia", language="Arabic", currency="Syrian pound", cities=["Aleppo", "Homs", "Latakia"]),
    dict(name="Tajikistan", capital="Dushanbe", continent="Asia", language="Tajik", currency="somoni", cities=["Khujand"]),
    dict(name="Thailand", capital="Bangkok", continent="Asia", language="Thai", currency="baht", cities=["Chiang Mai", "Phuket"]),
    dict(name="Turkey", capital="Ankara", continent="Asia", language="Turkish", currency="Turkish lira", cities=["Istanbul", "Izmir", "Antalya"]),
    dict(name="Turkmenistan", capital="Ashgabat", continent="Asia", language="Turkmen", currency="Turkmen manat", cities=["Turkmenabat", "Dashoguz"]),
    dict(name="United Arab Emirates", the=True, capital="Abu Dhabi", continent="Asia", language="Arabic", currency="UAE dirham", cities=["Dubai", "Sharjah"]),
    dict(name="Uzbekistan", capital="Tashkent", continent="Asia", language="Uzbek", currency="Uzbek som", cities=["Samarkand", "Bukhara"]),
    dict(name="Vietnam", capital="Hanoi", continent="Asia", language="Vietnamese", currency="dong", cities=["Ho Chi Minh City", "Da Nang", "Haiphong"]),
    dict(name="Yemen", capital="Sanaa", continent="Asia", language="Arabic", currency="Yemeni rial", cities=["Aden", "Taiz"]),
    # --- Africa ---------------------------------------------------------------------------
    dict(name="Algeria", capital="Algiers", continent="Africa", language="Arabic", currency="Algerian dinar", cities=["Oran", "Constantine"]),
    dict(name="Angola", capital="Luanda", continent="Africa", language="Portuguese", currency="kwanza", cities=["Huambo", "Lobito"]),
    dict(name="Benin", capital="Porto-Novo", continent="Africa", language="French", currency="CFA franc", cities=["Cotonou", "Parakou"]),
    dict(name="Botswana", capital="Gaborone", continent="Africa", language="Tswana", currency="pula", cities=["Francistown", "Maun"]),
    dict(name="Burkina Faso", capital="Ouagadougou", continent="Africa", language="French", currency="CFA franc", cities=["Bobo-Dioulasso", "Koudougou"]),
    dict(name="Burundi", capital="Gitega", continent="Africa", language="Kirundi", currency="Burundian franc", cities=["Bujumbura"]),
    dict(name="Cameroon", capital="Yaounde", continent="Africa", language="French", currency="CFA franc", cities=["Douala", "Garoua"]),
    dict(name="Cape Verde", capital="Praia", continent="Africa", language="Portuguese", currency="Cape Verdean escudo", cities=["Mindelo"]),
    dict(name="Central African Republic", the=True, capital="Bangui", continent="Africa", language="Sango", currency="CFA franc", cities=["Berberati", "Bambari"]),
    dict(name="Chad", capital="N'Djamena", continent="Africa", language="French", currency="CFA franc", cities=["Moundou", "Abeche"]),
    dict(name="Comoros", the=True, capital="Moroni", continent="Africa", language="Comorian", currency="Comorian franc", cities=["Mutsamudu"]),
    dict(name="Democratic Republic of the Congo", the=True, capital="Kinshasa", continent="Africa", language="French", currency="Congolese franc", cities=["Lubumbashi", "Kisangani", "Goma"]),
    dict(name="Republic of the Congo", the=True, capital="Brazzaville", continent="Africa", language="French", currency="CFA franc", cities=["Pointe-Noire", "Dolisie"]),
    dict(name="Egypt", capital="Cairo", continent="Africa", language="Arabic", currency="Egyptian pound", cities=["Alexandria", "Giza", "Luxor"]),
    dict(name="Eritrea", capital="Asmara", continent="Africa", language="Tigrinya", currency="nakfa", cities=["Massawa", "Keren"]),
    dict(name="Eswatini", capital="Mbabane", continent="Africa", language="Swazi", currency="lilangeni", cities=["Manzini"]),
    dict(name="Ethiopia", capital="Addis Ababa", continent="Africa", language="Amharic", currency="birr", cities=["Dire Dawa", "Gondar", "Mekelle"]),
    dict(name="Gabon", capital="Libreville", continent="Africa", language="French", currency="CFA franc", cities=["Port-Gentil", "Franceville"]),
    dict(name="Gambia", the=True, capital="Banjul", continent="Africa", language="English", currency="dalasi", cities=["Serekunda"]),
    dict(name="Ghana", capital="Accra", continent="Africa", language="English", currency="cedi", cities=["Kumasi", "Tamale"]),
    dict(name="Guinea", capital="Conakry", continent="Africa", language="French", currency="Guinean franc", cities=["Kankan", "Kindia"]),
    dict(name="Guinea-Bissau", capital="Bissau", continent="Africa", language="Portuguese", currency="CFA franc", cities=["Bafata"]),
    dict(name="Ivory Coast", capital="Yamoussoukro", continent="Africa", language="French", currency="CFA franc", cities=["Abidjan", "Bouake"]),
    dict(name="Kenya", capital="Nairobi", continent="Africa", language="Swahili", currency="Kenyan shilling", cities=["Mombasa", "Kisumu", "Nakuru"]),
    dict(name="Lesotho", capital="Maseru", continent="Africa", language="Sesotho", currency="loti", cities=["Mafeteng"]),
    dict(name="Liberia", capital="Monrovia", continent="Africa", language="English", currency="Liberian dollar", cities=["Gbarnga", "Buchanan"]),
    dict(name="Libya", capital="Tripoli", continent="Africa", language="Arabic", currency="Libyan dinar", cities=["Benghazi", "Misrata"]),
    dict(name="Madagascar", capital="Antananarivo", continent="Africa", language="Malagasy", currency="ariary", cities=["Toamasina", "Antsirabe"]),
    dict(name="Malawi", capital="Lilongwe", continent="Africa", language="Chichewa", currency="Malawian kwacha", cities=["Blantyre", "Mzuzu"]),
    dict(name="Mali", capital="Bamako", continent="Africa", language="Bambara", currency="CFA franc", cities=["Timbuktu", "Sikasso", "Mopti"]),
    dict(name="Mauritania", capital="Nouakchott", continent="Africa", language="Arabic", currency="ouguiya", cities=["Nouadhibou"]),
    dict(name="Mauritius", capital="Port Louis", continent="Africa", language="Mauritian Creole", currency="Mauritian rupee", cities=["Curepipe"]),
    dict(name="Morocco", capital="Rabat", continent="Africa", language="Arabic", currency="Moroccan dirham", cities=["Casablanca", "Marrakesh", "Fez"]),
    dict(name="Mozambique", capital="Maputo", continent="Africa", language="Portuguese", currency="metical", cities=["Beira", "Nampula"]),
    dict(name="Namibia", capital="Windhoek", continent="Africa", language="English", currency="Namibian dollar", cities=["Walvis Bay", "Swakopmund"]),
    dict(name="Niger", capital="Niamey", continent="Africa", language="Hausa", currency="CFA franc", cities=["Zinder", "Maradi", "Agadez"]),
    dict(name="Nigeria", capital="Abuja", continent="Africa", language="English", currency="naira", cities=["Lagos", "Kano", "Ibadan"]),
    dict(name="Rwanda", capital="Kigali", continent="Africa", language="Kinyarwanda", currency="Rwandan franc", cities=["Huye", "Musanze"]),
    dict(name="Senegal", capital="Dakar", continent="Africa", language="Wolof", currency="CFA franc", cities=["Touba", "Thies", "Ziguinchor"]),
    dict(name="Sierra Leone", capital="Freetown", continent="Africa", language="English", currency="leone", cities=["Bo", "Kenema"]),
    dict(name="Somalia", capital="Mogadishu", continent="Africa", language="Somali", currency="Somali shilling", cities=["Kismayo", "Baidoa"]),
    dict(name="South Africa", capital="Pretoria", continent="Africa", language="Zulu", currency="rand", cities=["Cape Town", "Johannesburg", "Durban"]),
    dict(name="South Sudan", capital="Juba", continent="Africa", language="English", currency="South Sudanese pound", cities=["Wau", "Malakal"]),
    dict(name="Sudan", capital="Khartoum", continent="Africa", language="Arabic", currency="Sudanese pound", cities=["Omdurman", "Port Sudan"]),
    dict(name="Tanzania", capital="Dodoma", continent="Africa", language="Swahili", currency="Tanzanian shilling", cities=["Dar es Salaam", "Arusha", "Mwanza"]),
    dict(name="Togo", capital="Lome", continent="Africa", language="French", currency="CFA franc", cities=["Sokode", "Kara"]),
    dict(name="Tunisia", capital="Tunis", continent="Africa", language="Arabic", currency="Tunisian dinar", cities=["Sfax", "Sousse"]),
    dict(name="Uganda", capital="Kampala", continent="Africa", language="English", currency="Ugandan shilling", cities=["Gulu", "Entebbe", "Jinja"]),
    dict(name="Zambia", capital="Lusaka", continent="Africa", language="English", currency="Zambian kwacha", cities=["Ndola", "Kitwe", "Livingstone"]),
    dict(name="Zimbabwe", capital="Harare", continent="Africa", language="Shona", currency=None, cities=["Bulawayo", "Mutare"]),
    # --- North America (with Central America and the Caribbean) ----------------------------
    dict(name="Canada", capital="Ottawa", continent="North America", language="English", currency="Canadian dollar", cities=["Toronto", "Montreal", "Vancouver"]),
    dict(name="United States", the=True, capital="Washington", continent="North America", language="English", currency="US dollar", cities=["New York", "Los Angeles", "Chicago"]),
    dict(name="Mexico", capital="Mexico City", continent="North America", language="Spanish", currency="Mexican peso", cities=["Guadalajara", "Monterrey", "Tijuana"]),
    dict(name="Guatemala", capital="Guatemala City", continent="North America", language="Spanish", currency="quetzal", cities=["Quetzaltenango", "Mixco"]),
    dict(name="Belize", capital="Belmopan", continent="North America", language="English", currency="Belize dollar", cities=["Belize City"]),
    dict(name="Honduras", capital="Tegucigalpa", continent="North America", language="Spanish", currency="lempira", cities=["San Pedro Sula", "La Ceiba"]),
    dict(name="El Salvador", capital="San Salvador", continent="North America", language="Spanish", currency="US dollar", cities=["Santa Ana", "San Miguel"]),
    dict(name="Nicaragua", capital="Managua", continent="North America", language="Spanish", currency="cordoba", cities=["Leon", "Masaya"]),
    dict(name="Costa Rica", capital="San Jose", continent="North America", language="Spanish", currency="colon", cities=["Limon", "Alajuela"]),
    dict(name="Panama", capital="Panama City", continent="North America", language="Spanish", currency="balboa", cities=["La Chorrera"]),
    dict(name="Cuba", capital="Havana", continent="North America", language="Spanish", currency="Cuban peso", cities=["Santiago de Cuba", "Camaguey"]),
    dict(name="Dominican Republic", the=True, capital="Santo Domingo", continent="North America", language="Spanish", currency="Dominican peso", cities=["Puerto Plata", "La Romana"]),
    dict(name="Haiti", capital="Port-au-Prince", continent="North America", language="Haitian Creole", currency="gourde", cities=["Cap-Haitien", "Gonaives"]),
    dict(name="Jamaica", capital="Kingston", continent="North America", language="English", currency="Jamaican dollar", cities=["Montego Bay", "Spanish Town"]),
    dict(name="Bahamas", the=True, capital="Nassau", continent="North America", language="English", currency="Bahamian dollar", cities=["Freeport"]),
    dict(name="Trinidad and Tobago", capital="Port of Spain", continent="North America", language="English", currency="Trinidad and Tobago dollar", cities=["San Fernando", "Chaguanas"]),
    dict(name="Barbados", capital="Bridgetown", continent="North America", language="English", currency="Barbadian dollar", cities=["Speightstown"]),
    # --- South America ----------------------------------------------------------------------
    dict(name="Argentina", capital="Buenos Aires", continent="South America", language="Spanish", currency="Argentine peso", cities=["Rosario", "Mendoza"]),
    dict(name="Bolivia", capital="Sucre", continent="South America", language="Spanish", currency="boliviano", cities=["La Paz", "Cochabamba"]),
    dict(name="Brazil", capital="Brasilia", continent="South America", language="Portuguese", currency="Brazilian real", cities=["Sao Paulo", "Rio de Janeiro", "Recife"]),
    dict(name="Chile", capital="Santiago", continent="South America", language="Spanish", currency="Chilean peso", cities=["Valparaiso", "Concepcion", "Antofagasta"]),
    dict(name="Colombia", capital="Bogota", continent="South America", language="Spanish", currency="Colombian peso", cities=["Medellin", "Cali", "Cartagena"]),
    dict(name="Ecuador", capital="Quito", continent="South America", language="Spanish", currency="US dollar", cities=["Guayaquil", "Cuenca"]),
    dict(name="Guyana", capital="Georgetown", continent="South America", language="English", currency="Guyanese dollar", cities=["Linden"]),
    dict(name="Paraguay", capital="Asuncion", continent="South America", language="Spanish", currency="guarani", cities=["Ciudad del Este", "Encarnacion"]),
    dict(name="Peru", capital="Lima", continent="South America", language="Spanish", currency="Peruvian sol", cities=["Arequipa", "Cusco", "Trujillo"]),
    dict(name="Suriname", capital="Paramaribo", continent="South America", language="Dutch", currency="Surinamese dollar", cities=["Lelydorp"]),
    dict(name="Uruguay", capital="Montevideo", continent="South America", language="Spanish", currency="Uruguayan peso", cities=["Salto", "Paysandu"]),
    dict(name="Venezuela", capital="Caracas", continent="South America", language="Spanish", currency="bolivar", cities=["Maracaibo", "Barquisimeto"]),
    # --- Oceania ------------------------------------------------------------------------------
    dict(name="Australia", capital="Canberra", continent="Oceania", language="English", currency="Australian dollar", cities=["Sydney", "Melbourne", "Brisbane"]),
    dict(name="New Zealand", capital="Wellington", continent="Oceania", language="English", currency="New Zealand dollar", cities=["Auckland", "Christchurch"]),
    dict(name="Fiji", capital="Suva", continent="Oceania", language="English", currency="Fijian dollar", cities=["Nadi", "Lautoka"]),
    dict(name="Papua New Guinea", capital="Port Moresby", continent="Oceania", language="Tok Pisin", currency="kina", cities=["Lae", "Mount Hagen"]),
    dict(name="Solomon Islands", the=True, capital="Honiara", continent="Oceania", language="English", currency="Solomon Islands dollar", cities=["Gizo", "Auki"]),
    dict(name="Vanuatu", capital="Port Vila", continent="Oceania", language="Bislama", currency="vatu", cities=["Luganville"]),
    dict(name="Tonga", capital="Nuku'alofa", continent="Oceania", language="Tongan", currency="pa'anga", cities=["Neiafu"]),
]

CONTINENTS = ["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]


def country_phrase(c: dict, start: bool = False) -> str:
    """The country as it reads inside a sentence ("France", "the United States")."""
    if c.get("the"):
        return ("The " if start else "the ") + c["name"]
    return c["name"]


def capital_prompt(c: dict) -> str:
    """The paper's first template without its object: "The capital of France is"."""
    return f"The capital of {country_phrase(c)} is"


def city_prompt(city: str, c: dict) -> str:
    """The paper's second template without its object ("Lyon is located in the country of"); for a
    country written with "the" the article is part of the prompt, since the next word is then "the"
    ("Chicago is located in the country of the" -> "United States")."""
    return f"{city} is located in the country of" + (" the" if c.get("the") else "")


def city_facts() -> list[tuple[str, dict]]:
    """(city, country) for every city of the corpus, capitals first in country order, then the others."""
    return [(c["capital"], c) for c in COUNTRIES] + [(y, c) for c in COUNTRIES for y in c["cities"]]


def _check() -> None:
    names = [c["name"] for c in COUNTRIES]
    assert len(set(names)) == len(names), "duplicate country"
    cities = [y for y, _ in city_facts()]
    dup = {y for y in cities if cities.count(y) > 1}
    assert not dup, f"city listed twice: {dup}"
    assert not set(cities) & set(names), "a city shares a country's name"
    for c in COUNTRIES:
        assert c["continent"] in CONTINENTS, c
        assert 1 <= len(c["cities"]) <= 3, c
        assert c["capital"] not in c["cities"], c


_check()
